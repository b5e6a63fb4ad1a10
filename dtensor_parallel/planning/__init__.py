"""Planning before a cluster is booked: the memory estimator, the degree planner, the dry run
on a fake process group, and the schedule/memory drawings."""
