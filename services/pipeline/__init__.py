"""The pipeline runner service: scheduled and operator-triggered retraining runs."""
