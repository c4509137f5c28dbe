"""The fleet: device groups, retiring devices, and the desired model of every device, resolved and published."""
