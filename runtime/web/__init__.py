"""HTTP plumbing the dashboard and the OpenAI-compatible server share: Host checks, bounded JSON bodies, request-head deadlines, the listening socket."""
