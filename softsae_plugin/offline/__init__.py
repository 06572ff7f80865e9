"""Offline stand-ins for the Hub that ship as Python packages: SmolLM2-135M and English Wikipedia text."""
