"""A randomized soak: tasks flow while faults strike at random moments; every task is counted by id."""
