"""The firewall (ufw)."""

from __future__ import annotations

from .engine import Change, Ok, Resource, q


class Firewall(Resource):
    """ufw: incoming denied by default, ``allow`` rules present, firewall enabled.

    ``allow`` holds ufw rule specs: application profiles ("OpenSSH"), "PORT/PROTO"
    ("443/tcp", from anywhere) or "PORT/PROTO from ADDRESS" ("5432/tcp from 10.0.0.11",
    from that address only). The rules are added before ufw is enabled, so enabling it
    never cuts the SSH session doing it. Rules added by others are left alone and listed.
    """

    what = "firewall (ufw)"

    def __init__(self, allow: list[str] | tuple = ("OpenSSH", "80/tcp", "443/tcp")):
        self.allow = list(allow)

    def probe(self) -> str:
        return ("grep -h '^ENABLED=' /etc/ufw/ufw.conf 2>/dev/null\n"
                "grep -h '^DEFAULT_INPUT_POLICY=' /etc/default/ufw 2>/dev/null\n"
                "grep -h '^### tuple ###' /etc/ufw/user.rules /etc/ufw/user6.rules "
                "2>/dev/null; true")

    @staticmethod
    def _matches(spec: str, rule: list[str]) -> bool:
        # rule: action proto dport dst sport src [dapp sapp] direction
        if rule[0] != "allow":
            return False
        if "/" in spec:
            port_proto, _, source = spec.partition(" from ")
            port, proto = port_proto.split("/", 1)
            return (rule[1] == proto and rule[2] == port and len(rule) == 7
                    and rule[5] in ((source,) if source else ("0.0.0.0/0", "::/0")))
        return len(rule) == 9 and rule[6] == spec

    @staticmethod
    def _command(spec: str) -> str:
        port_proto, _, source = spec.partition(" from ")
        if not source:
            return f"ufw allow {q(spec)} >/dev/null"
        port, proto = port_proto.split("/", 1)
        return f"ufw allow from {q(source)} to any port {q(port)} proto {q(proto)} >/dev/null"

    def plan(self, state, host):
        lines = state.splitlines()
        enabled = "ENABLED=yes" in lines
        policy_ok = 'DEFAULT_INPUT_POLICY="DROP"' in lines
        rules = [line.split()[3:] for line in lines if line.startswith("### tuple ###")]
        missing = [s for s in self.allow if not any(self._matches(s, r) for r in rules)]
        extra = list(dict.fromkeys(  # a rule for both IPv4 and IPv6 is listed once
            " ".join(r[:3]) + ("" if r[5] in ("0.0.0.0/0", "::/0") else f" from {r[5]}")
            for r in rules if not any(self._matches(s, r) for s in self.allow)))
        cmds, done = [self._command(s) for s in missing], []
        if missing:
            done.append(f"allowed {', '.join(missing)}")
        if not policy_ok:
            cmds.append("ufw default deny incoming >/dev/null")
            done.append("incoming denied by default")
        if not enabled:
            cmds.append("ufw --force enable >/dev/null")
            done.append("enabled")
        note = f" (other rules left alone: {'; '.join(extra)})" if extra else ""
        if not cmds:
            return Ok(f"enabled, deny incoming, allows {', '.join(self.allow)}{note}")
        return Change(", ".join(done) + note, "\n".join(cmds))
