"""Deployments on separate hosts: from a list of hosts to the files each host runs."""
