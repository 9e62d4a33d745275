"""Studies: a grid of runs, executed locally or on Ray, gathered into one table and a report."""
