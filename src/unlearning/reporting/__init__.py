"""Tables, reports across run directories, ranks of weight updates, plots."""
