"""Helpers the tests import: tiny models, wire-level calls, fake servers, deployment tools."""
