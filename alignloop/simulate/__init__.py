"""`alignloop simulate`: simulated users of the public API. They chat through the gateway with an application
key and give feedback by fixed, documented rules (`labeler`), so the loop can be exercised and measured
without people. Nothing here imports services/ or pipelines/: it is a client like any other.

Modules: `labeler` (the rules and the noisy labeler), `prompts` (what users ask, held-out split), `traffic`
(the HTTP driver and its report), `cli` (the subcommand)."""
