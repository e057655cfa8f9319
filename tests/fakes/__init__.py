"""Loopback stand-ins for what cannot run here: Schwab's token endpoint and the C++ bot."""
