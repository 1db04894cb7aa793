from lata.cli import entry

entry()
