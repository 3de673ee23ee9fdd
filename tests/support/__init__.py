"""Real helpers for the tests: a mosquitto broker on a free port, MQTT collectors, media servers."""
