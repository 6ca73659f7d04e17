"""Test support: a fake conversation engine and a harness for the Procfile's processes."""
