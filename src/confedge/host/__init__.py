"""The host around confedge: the firewall ruleset (nftables/iptables), the kernel ban set the
guard fills, the systemd unit and its sd_notify protocol. See docs/DEPLOY.md."""
