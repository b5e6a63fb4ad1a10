"""Pipeline parallelism on the "pp" dim: splitting into stages, schedules, runtime."""
