"""Structured output: constraints (``GuidedDecodingParams``), their compiled form per backend
(``GuidedCompiler``) and the per-request matchers the runner advances (``GuidedBatch``)."""
