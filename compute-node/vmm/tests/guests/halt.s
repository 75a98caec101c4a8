# Halts forever.
.code32
1: hlt
  jmp 1b
