"""Running the pipeline: stages, the run directory and the report (the only code that knows a run
directory)."""
