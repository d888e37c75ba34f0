

productionexample.appeu-central-1"H
node-1>age1se5ghfycr4n8kcwc3qwf234ymvmr2lex2a99wh8gpfx97glwt9hqch4569