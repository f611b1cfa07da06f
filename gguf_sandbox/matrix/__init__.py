"""The resource-limit matrix: matrix.yaml loaded, expanded into cells, run, judged, recorded, reported."""
