"""What every tier runs: stage timing (the profiler)."""
