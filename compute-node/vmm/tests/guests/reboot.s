.code32
start:
  mov $0x3f8, %dx
  mov $'R', %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  mov $0x64, %dx
  mov $0xfe, %al
  out %al, %dx
1: hlt
  jmp 1b
