"""Fleet monitoring: drift statistics, performance estimates, sequential detectors and window sketches."""
