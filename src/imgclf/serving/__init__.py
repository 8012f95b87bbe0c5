"""Shipping a run: ONNX export with its preprocessing inside (``export``), engines that answer from the
export or the run's own model (``engine``), and the HTTP server with its drop-an-image page (``server``)."""
