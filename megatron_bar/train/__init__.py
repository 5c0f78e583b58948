"""One trainer for every BAR stage (midtrain, sft, rlvr, router)."""
