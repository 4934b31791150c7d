"""Ray Serve applications: deployments, pydantic app args and `build_app(args) -> Application` builders.

Each module here is one HTTP application speaking the OpenAI completions shape
(`POST /v1/completions`) plus its own statistics:

- `retrieval`: CD-LM decoding, a target model deployment beside a sharded datastore deployment.
- `speculative`: speculative decoding, a target deployment and one deployment per drafter
  (`speculative_drafter`), one round trip per step over the `loopback` socket where they share a node.

`schemas` holds the types (app arguments, requests with their validation, what crosses between
deployments), `openai_api` the OpenAI-shaped plumbing both apps share.

Run one with `serve run distilray.serve_apps.<app>:build_app key=value ...` or list it in
`serve_config.yaml` and `serve deploy serve_config.yaml`.
"""
