"""One call end to end: the job runner, the jobs taken along (companions), group sampling and batching."""
