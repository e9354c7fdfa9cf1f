"""The signing agent: the broker signs for its bot over a private Unix socket.

``protocol`` (the wire, written once: the bot's client ``broker.signing.agent``
imports it and ``broker.errors`` only), ``server`` (the serving thread),
``peer`` (who may connect), ``policy`` (the sign op's policy glue), ``run``
(what ``credbroker run --agent`` calls). Import the module you need: this
package itself loads nothing, so the bot's client never loads the server.
"""
