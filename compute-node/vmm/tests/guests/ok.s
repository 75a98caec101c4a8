.code32
start:
  mov $0x3f8, %dx
  mov $'O', %al
  out %al, %dx
  mov $'K', %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  mov $0x600, %dx
  mov $0x34, %al
  out %al, %dx
1: hlt
  jmp 1b
