"""Ray Serve applications: deployments, pydantic app args and `build_app(args) -> Application` builders.

Each module here is one HTTP application speaking the OpenAI completions shape
(`POST /v1/completions`) plus its own statistics:

- `retrieval`: CD-LM decoding, a target deployment (the app's HTTP ingress) beside a sharded
  datastore deployment, or with the datastore inside it.
- `speculative`: speculative decoding, a target deployment (the app's HTTP ingress) and one deployment
  per drafter (`speculative_drafter`), one round trip per step over the `loopback` socket where they
  share a node, or drafters inside the target.
- `diffusion` (MDLM / SDTT sampling) and `tfree` (T-Free word decoding): a model deployment behind an
  ingress deployment.

`schemas` holds the types (app arguments, requests with their validation, what crosses between
deployments), `openai_api` the OpenAI-shaped plumbing the apps share, `batching` the continuous
batching loop of the two text targets, `text_output` their prompt rendering and streamed text.

Run one with `serve run distilray.serve_apps.<app>:build_app key=value ...` or list it in
`serve_config.yaml` and `serve deploy serve_config.yaml`.
"""
