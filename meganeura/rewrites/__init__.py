"""egglog rulesets, one file per family, composed into one schedule."""
