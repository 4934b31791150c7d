"""Ray Serve applications: deployments, pydantic app args and `build_app(args) -> Application` builders.

Each module here is one HTTP application speaking the OpenAI completions shape
(`POST /v1/completions`) plus its own statistics:

- `retrieval`: CD-LM decoding, a target model deployment beside a sharded datastore deployment.

Run one with `serve run distilray.serve_apps.<app>:build_app key=value ...` or list it in
`serve_config.yaml` and `serve deploy serve_config.yaml`.
"""
