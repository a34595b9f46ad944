"""HTTP handlers: parse and validate input, call one service, serialise the answer."""
