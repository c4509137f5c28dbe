"""Built-in cabin scenarios (YAML) for the simulated source; load them with ``load_scenario(name)``."""
