"""The capture report: data-capture records of the endpoint checked against a baseline of the model."""
