"""Learning from the home: training data from Home Assistant's history (issue 20).

The daemon never imports this package's training side; ``edge-infer learn``
runs it as a separate command, and training itself in a child process.
"""
