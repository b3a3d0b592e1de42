"""End-to-end tests: real agent, control-plane and NATS processes, nothing mocked."""
