"""One module per Ray job: run(config) -> result paths and figures."""
