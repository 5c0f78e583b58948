"""What is specific to BAR: upcycling, freeze schedules, merging, router training."""
