"""Conventions layered on the gRPC contracts in proto/ that both client and server must agree on."""

# An INVALID_ARGUMENT status carries the offending request field's name under this trailing-metadata key,
# so that the gateway can name it in its 400 response.
PARAM_METADATA_KEY = "alignloop-param"
