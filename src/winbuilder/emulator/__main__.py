from winbuilder.emulator.cli import emulator

emulator(prog_name="winbuilder emulator")
