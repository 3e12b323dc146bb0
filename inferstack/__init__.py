"""Code shared by the web tier and the worker: config, the queue protocol, image decoding."""
