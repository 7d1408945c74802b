"""Test helpers shipped with the library: split-feed checks, fault-injecting files, crash drivers."""
