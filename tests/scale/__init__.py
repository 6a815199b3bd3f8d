"""Scale tests: dozens of instances, each its own OS process, on a server of 100 connections."""
