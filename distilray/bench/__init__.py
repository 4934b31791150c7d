"""`distilray bench <name>`: one module per benchmark; each has run(cfg) -> dict and format_table(dict) -> str."""
