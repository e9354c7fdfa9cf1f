# credbroker-audit-anchor: the broker on ONE host anchors its audit log's head here.
#
# A template, like credbroker-bot.hcl: `scripts/setup-vault --anchor-host HOST BOT`
# replaces every __HOST__ with the host's name (`uname -n`, characters outside
# [A-Za-z0-9._-] as "_") and writes it as the policy credbroker-audit-anchor-HOST,
# attached to the bot's AppRole next to its bot policy. The bot policy itself
# grants nothing here, and neither does the signing child token a transit bot gets.
#
# Append-only from the broker's side: it may write new versions and read them
# back (`credbroker audit verify` compares the local chain with every retained
# version), but not delete, undelete or destroy versions, nor change or delete
# the metadata (so it cannot lower max_versions, which setup-vault sets).
# Each anchor is MAC'd with the audit key; a token without the key cannot
# write one that verifies.

# One secret per chain: secret/credbroker-audit/HOST/<key id>-<log id>.
path "secret/data/credbroker-audit/__HOST__/*" {
  capabilities = ["create", "update", "read"]
}

# The list of retained versions, to read each of them.
path "secret/metadata/credbroker-audit/__HOST__/*" {
  capabilities = ["read"]
}
