"""Project scripts; a package so tests can import the libraries here (scenes, evaluate, bad_models)."""
