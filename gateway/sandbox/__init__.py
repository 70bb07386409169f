"""Sandbox partners: real protocols over real sockets, for the demo, the tests and drills."""
