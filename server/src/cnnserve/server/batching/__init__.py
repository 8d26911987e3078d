"""The dynamic batcher: queue, batch plan, where each batch runs, thread split, rows."""
