"""The batch-inference job: inputs, the job itself and its resumable output file."""
