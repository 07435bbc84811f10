"""The discrete-event simulator (pure Python, no JAX): traces, step-time models, and the scheduler's own policy
objects replayed in virtual time; also the scheduler-decision microbenchmark."""
