"""Conventions layered on the gRPC contracts in proto/ that both client and server must agree on."""

# An INVALID_ARGUMENT status carries the offending request field's name under this trailing-metadata key,
# so that the gateway can name it in its 400 response.
PARAM_METADATA_KEY = "alignloop-param"

# The pipeline runner names the run that blocks a StartRun (ALREADY_EXISTS) in this trailing metadata key.
RUN_ID_METADATA_KEY = "alignloop-run-id"

# A registered reward-model version that was never trained (the bootstrap placeholder) carries this tag = "true".
UNTRAINED_TAG = "alignloop.untrained"

# The share of chat traffic (0..100) the gateway sends to the challenger (`alignloop-policy@challenger`), as a
# tag on the registered policy model; `pipelines/promotion.py` writes it, the canary policy service reports it.
CANARY_PERCENT_TAG = "alignloop.canary_percent"

# Most token ids one request's logit_bias may name (OpenAI's limit); the gateway and the policy service both
# refuse more.
LOGIT_BIAS_MAX_ENTRIES = 300
