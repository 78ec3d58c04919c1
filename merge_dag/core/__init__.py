"""The pure core: checkpoint I/O, recipes, parameter maps, merge methods. Imports no Dagster."""
